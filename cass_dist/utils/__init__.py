"""Small helpers shared by the engine and the launch layer."""
