"""End-to-end tests: agent processes, a private dockerd, gpuctl as a user runs it, real Airflow,
`gpuctl dev`, a real GPU."""
