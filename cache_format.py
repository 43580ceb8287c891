"""The dataset cache's layout, shared by its writer (convert.py) and its reader (dataloading.py).

No torch or pandas here: `convert.py --check` and the shell scripts stay instant.
"""
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"  # written last: a cache without it is incomplete
TENSOR_FILES = ("train_ratings.pt", "test_ratings.pt", "test_negatives.pt", "user_ids.pt", "item_ids.pt")
