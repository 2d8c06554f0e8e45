"""The game's application layer on PostgreSQL + Redis: cache classes and the game API service.

It imports the engine's key schema and mapping loader (`pbmigrate`, which has no Airflow
imports); the engine and the DAGs never import it.
"""
