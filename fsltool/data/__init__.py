"""Data: sources of labelled images -> one packed HDF5 file -> episodes."""
