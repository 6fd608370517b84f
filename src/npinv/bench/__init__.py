"""Benchmark runners: resumable JSONL rows, summaries, markdown tables and plots."""
