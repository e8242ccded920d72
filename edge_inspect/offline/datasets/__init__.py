"""Datasets for evaluation, benches, the demo and the tests: the MVTec AD layout (mvtec), converters of
real sets into it (convert) and generated sets with painted defects (generate)."""
