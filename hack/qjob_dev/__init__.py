"""Development harness (not shipped in the images): a real local control plane with simulated GPU
nodes, a pod runner that runs runner pods as local processes, the operator as a local process,
tiny models, waits, and the ``make demo`` script. Tests, benchmarks and the demo import it."""
