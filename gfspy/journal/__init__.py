"""The journal: transactions, the log writer with its active items list, and replay."""
