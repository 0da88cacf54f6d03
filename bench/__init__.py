"""Benchmarks that compare Quill with its peers in one run and write their tables into docs/.

    quill bench engine [--quick] [--models small,medium] [--peers ...]   (see bench/engine.py)
"""
