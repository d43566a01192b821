"""The analysis service: feature rankings and their aggregates, variant comparisons, steering runs,
the EM evaluation and the known-answer validation."""
