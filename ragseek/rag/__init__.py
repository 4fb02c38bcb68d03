"""The retrieval half of RAG: documents -> chunks -> embeddings -> a SQLite store -> exact / ANN / SVM / MMR / BM25 /
hybrid search, evaluated on BEIR.

    documents.py  loaders (.txt .md .html .pdf BEIR .jsonl) and cleaning that keeps offsets into the raw text
    splitters.py  fixed-length and recursive splitters, chunks with char offsets
    embedders.py  MiniLM (sentence-transformers), word2vec and GloVe trained on the corpus
    store.py      the SQLite system of record: transactional, idempotent ingest, cached embeddings
    search.py     similarity, kNN, HNSW, BM25, RRF / convex fusion, SVM retrieval, MMR; `Searcher` over a store
    evaluate.py   BEIR loading, nDCG@10 / Recall@k / MRR@10
    cli.py        `ragseek ingest | info | search`, `ragseek eval beir`
"""
