"""The test suite; its folders mirror the packages (helpers: shared test code)."""
