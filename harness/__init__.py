"""What the tests, the benchmarks and the development targets share: commands run as a user runs
them, throwaway copies of the repository, the serving stack on free local ports, a local file server,
hand-made image bytes, and `make mutate`'s summary."""
