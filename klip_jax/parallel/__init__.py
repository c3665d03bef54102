"""Device meshes, logical-axis rules, and sharded initialisation."""
