"""Data tools for otmel: a synthetic MEL world generator (make_synthetic) and a converter from the
MIMIC folder layout to a Parquet dataset folder (convert_mimic).  See README.md here."""
