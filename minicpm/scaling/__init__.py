"""The WSD scaling campaign (paper §4.5), schedule comparison (§4.3), decay branches, the planner."""
