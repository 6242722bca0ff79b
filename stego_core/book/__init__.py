"""The book tooling (placeholder until the book subpackage lands)."""
