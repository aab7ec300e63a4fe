"""The online half: artifact -> scorer -> one HTTP API for every use case (``python -m unirec.serve``)."""
