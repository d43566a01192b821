"""Running the system: the broker (embedded Redis), the process supervisor, malloc limits."""
