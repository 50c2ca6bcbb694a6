"""Handles to models: where they come from (registry, bundled), engines, our output head, served clients, and the scorer and teacher handles the stages drive. Imports only curate.kernel."""
