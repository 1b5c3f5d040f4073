"""What the tests and the benchmarks share: commands run as a user runs them, throwaway copies of the
repository, the serving stack on free local ports, a local file server and hand-made image bytes."""
