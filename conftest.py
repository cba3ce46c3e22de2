# Tests never touch the network: a hub id would otherwise retry for minutes.
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPI_PRESET", "tiny")
