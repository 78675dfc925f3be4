"""Helpers the tests share (test modules never import each other)."""
