"""RAG, the lecture's whole pipeline: documents -> chunks -> embeddings -> a store, then at question time
query -> retrieve -> rerank -> answer with citations; evaluated on BEIR (retrieval) and SQuAD (answers).

Preprocessing
    documents.py   loaders (.txt .md .html .pdf BEIR .jsonl) and cleaning that keeps offsets into the raw text
    splitters.py   fixed-length and recursive splitters, chunks with char offsets, in characters or tokens
    embedders.py   MiniLM (sentence-transformers), word2vec and GloVe trained on the corpus
    contextual.py  contextual retrieval: an LLM-written context per chunk, embedded and BM25-indexed with it
    store.py       the SQLite system of record: transactional, idempotent ingest, cached embeddings
    pgstore.py     the same store on PostgreSQL + pgvector (`--store postgresql://...`)
Processing
    search.py      similarity, kNN, HNSW, BM25, RRF / convex fusion, SVM retrieval, MMR; `Searcher` over a store
    query.py       query transformation: naive, rewrite, multi-query (RAG-Fusion), HyDE
    rerank.py      the LLM reranker: pointwise log P("yes") - log P("no")
    pipeline.py    `ask`: query -> retrieve -> rerank -> build_prompt -> generate -> citations, each step callable
Evaluation and commands
    evaluate.py    BEIR (nDCG@10 / Recall@k / MRR@10) and SQuAD QA (EM, F1, citation accuracy, don't-know rate)
    cli.py         `ragseek ingest | info | search | ask`, `ragseek eval beir | qa`
"""
