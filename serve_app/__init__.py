"""Quill: serve GPT-2-family text-generation models to many writers at once."""
