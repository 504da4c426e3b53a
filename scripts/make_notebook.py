"""Writes notebooks/explore_catalog.ipynb (kept as a script so the notebook's source is reviewable)."""

from pathlib import Path

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# Explore the ProbeX catalog\n\n"
        "The catalog is a plain LanceDB database: `models`, `trees` and `embeddings` tables. "
        "Reading them needs no project code; asking questions in the weight-language space "
        "(text search, zero-shot classification) uses `storage.query`.\n\n"
        "Set `PROBEX_HOME` (default `./.probex`) to the home whose catalog you want, or "
        "`PROBEX_CATALOG` to a catalog elsewhere (a folder or `s3://bucket/catalog`; the store's own "
        "variables, `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ..., say how to reach it)."),
    nbf.v4.new_code_cell(
        "import os\nfrom pathlib import Path\n\nimport lancedb\n\n"
        "home = Path(os.environ.get('PROBEX_HOME', '.probex')).absolute()\n"
        "catalog = os.environ.get('PROBEX_CATALOG') or str(home / 'catalog')\n"
        "options = {}\n"
        "endpoint = os.environ.get('AWS_ENDPOINT_URL')\n"
        "if catalog.startswith('s3://') and endpoint:  # an S3-compatible server (MinIO, ...)\n"
        "    options = {'aws_endpoint': endpoint, 'allow_http': str(endpoint.startswith('http:')).lower()}\n"
        "db = lancedb.connect(catalog, storage_options=options)\n"
        "db.list_tables().tables"),
    nbf.v4.new_markdown_cell("## The tables, with plain LanceDB and pandas"),
    nbf.v4.new_code_cell(
        "models = db.open_table('models').to_pandas()\n"
        "trees = db.open_table('trees').to_pandas()\n"
        "emb = db.open_table('embeddings').to_pandas()\n"
        "trees[['tree_id', 'n_models', 'task', 'layer', 'expert_version']]"),
    nbf.v4.new_code_cell("models.groupby(['tree_id', 'status'], dropna=False).size()"),
    nbf.v4.new_markdown_cell("## SQL over the tables with DuckDB\n\nWhich trees hold undocumented models, "
                             "and what do their experts say they were trained on?"),
    nbf.v4.new_code_cell(
        "import duckdb\n\n"
        "models_arrow = db.open_table('models').to_arrow()\n"
        "emb_arrow = db.open_table('embeddings').to_arrow()\n"
        "undocumented = duckdb.sql('''\n"
        "    SELECT m.repo_id, m.tree_id, e.top_labels[1] AS predicted, e.top_scores[1] AS score\n"
        "    FROM models_arrow m JOIN emb_arrow e USING (repo_id, sha)\n"
        "    WHERE m.labels IS NULL OR list_contains(m.labels, 'LABEL_0')\n"
        "    ORDER BY score DESC\n"
        "''').df()\n"
        "undocumented.head(10)"),
    nbf.v4.new_markdown_cell("## Polars: models per tree and relation"),
    nbf.v4.new_code_cell(
        "import polars as pl\n\n"
        "pl.from_arrow(models_arrow).group_by('tree_id', 'relation').len().sort('len', descending=True)"),
    nbf.v4.new_markdown_cell("## Text search and zero-shot classification"),
    nbf.v4.new_code_cell(
        "from storage.query import CatalogQuery\n\n"
        "q = CatalogQuery.open(home=home)\n"
        "text_tree = next(t for t in q.trees().values() if t.head.name == 'text')\n"
        "query = text_tree.labels[0]\n"
        "hits = q.search(query, k=5)\n"
        "hits[['repo_id', 'tree_id', 'score', 'top_labels']]"),
    nbf.v4.new_code_cell(
        "model = hits.repo_id[0]\n"
        "q.classify(model, text_tree.labels[:3] + ['a kind of vehicle'])"),
    nbf.v4.new_code_cell("q.similar(model, k=5)[['repo_id', 'score', 'top_labels']]"),
    nbf.v4.new_markdown_cell("## A tree's models in the joint space (2-D PCA), coloured by predicted class"),
    nbf.v4.new_code_cell(
        "import matplotlib\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n\n"
        "tree_emb = emb[emb.tree_id == text_tree.tree_id]\n"
        "X = np.stack(tree_emb.vector.to_numpy())\n"
        "X = X - X.mean(0)\n"
        "_, _, vt = np.linalg.svd(X, full_matrices=False)\n"
        "xy = X @ vt[:2].T\n"
        "labels = [t[0] for t in tree_emb.top_labels]\n"
        "fig, ax = plt.subplots(figsize=(6, 5))\n"
        "for lab in sorted(set(labels)):\n"
        "    m = np.array([l == lab for l in labels])\n"
        "    ax.scatter(xy[m, 0], xy[m, 1], s=18, label=lab)\n"
        "ax.set_title(f'{text_tree.tree_id}: {len(tree_emb)} models')\n"
        "if len(set(labels)) <= 12:\n"
        "    ax.legend(fontsize=7)\n"
        "fig.savefig(home / 'tree_embeddings.png', dpi=100)\n"
        "len(tree_emb)"),
    nbf.v4.new_markdown_cell("## Yesterday's catalog: every embed run tags a table version"),
    nbf.v4.new_code_cell(
        "table = db.open_table('embeddings')\n"
        "tags = table.tags.list()\n"
        "first = sorted(tags)[0]\n"
        "table.checkout(tags[first]['version'] if isinstance(tags[first], dict) else tags[first].version)\n"
        "old_rows = table.count_rows()\n"
        "table.checkout_latest()\n"
        "first, old_rows"),
]
for i, cell in enumerate(cells):
    cell.id = f"cell-{i:02d}"  # stable ids: regenerating the notebook changes only what changed
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
out = Path(__file__).resolve().parents[1] / "notebooks" / "explore_catalog.ipynb"
nbf.write(nb, out)
print(out)
