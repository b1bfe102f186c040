"""Finding subnets: budgets and costs, accuracy sources, evolutionary search, Pareto fronts, the
accuracy predictor and the accuracy-versus-architecture analysis."""

from .accuracy import AccuracyFn, CachedAccuracy, DistributedAccuracy, is_main_process
from .budget import METRICS, Budget, Constraint, CostModel, check_budget_feasible, parse_number
from .evolution import (
                        EvolutionSearch,
                        SearchConfig,
                        SearchResult,
                        best_of_measured,
                        distinct_measured,
                        random_search,
                        rerank_finalists,
                        search_budgets,
)
from .outputs import pareto_front, write_csv, write_pareto, write_search_outputs

__all__ = ["AccuracyFn", "Budget", "CachedAccuracy", "Constraint", "CostModel", "DistributedAccuracy",
           "EvolutionSearch", "METRICS", "SearchConfig", "SearchResult", "best_of_measured", "check_budget_feasible",
           "distinct_measured", "is_main_process", "pareto_front", "parse_number", "random_search", "rerank_finalists",
           "search_budgets", "write_csv", "write_pareto", "write_search_outputs"]
