"""What to run (parent process): suite TOML -> validated spec -> cells; precision registry; preflight checks."""
