"""The reconciler: makes what runs match what memory says should run, and derives each pod's
status from what its runtime driver observes."""
