"""The PostgreSQL index's table names, in one place for every module that writes SQL."""

IMAGES = "imagefinder_images"
META = "imagefinder_meta"
# The row count, kept by every write in its own transaction: count(*) reads the whole
# table (seconds at tens of millions), and the API asks on every search.
STATS = "imagefinder_stats"
HNSW = "imagefinder_images_hnsw"
