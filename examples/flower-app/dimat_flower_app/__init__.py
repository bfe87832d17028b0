"""A Flower App whose ServerApp aggregates client models with dimat's activation matching."""
