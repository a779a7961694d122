"""Console pages, one router per resource."""
