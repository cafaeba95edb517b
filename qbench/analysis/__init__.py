"""Records -> one DataFrame, statistics, reports (report/) and the regression gate (gate/); the parent process."""
