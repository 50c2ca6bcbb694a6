"""The workspace: a directory of Parquet tables, their schemas, SQL views over them, example streams, run references and integrity checks. Imports only curate.kernel."""
