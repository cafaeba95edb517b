"""Test helpers: tiny assets built in temporary folders (tests need neither the network nor a GPU)."""
