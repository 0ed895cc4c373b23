"""The paper's tables in miniature, from one run folder (`allmrec-tables`).

`suite.PaperTables(config, workdir, ...)` takes a run whose CF model and stage 1 are
finished (the `launch/train.py` run of the same config) and builds, part by part, what the
paper reports; every model is scored on the same seeded test users and their 20 stored
candidates (the `eval.*` protocol of stage 2, `users` of them). One module per part:

- overall.py: the four CF backbones, popularity, LLM-Only, TALLRec, MLP-LLM, A-LLMRec
  (SBERT) and A-LLMRec: ranking hit@1/5, NDCG@10, MRR and generation hit@1
  (+ `overall.png`); and cold_warm, every overall row on the users whose target is a
  cold / warm item (bottom / top `data.cold_fraction` of items by interaction count);
- cold_users.py: users held out of every training stage, cut to 3 interactions (2
  history, 1 target; `data.num_cold_users` of them); CF, popularity, LLM-Only and A-LLMRec
  trained again without them;
- few_shot.py: stage 2 (A-LLMRec, A-LLMRec (SBERT), TALLRec) trained on K seeded users
  only (`few_shot_scope="all"`: the CF model and stage 1 as well, the paper's setting, in
  which the K-user CF model gets its own row);
- cross_domain.py: trained on one domain and asked about another without fine-tuning;
  the target domain's items get their joint embedding from text (f_T^enc(SBERT(text)));
  the CF model has never seen those items, so by default the models run without the user
  token (`cross_domain_user="decoded"`: x_u from the source CF model over stage 1's
  f_I^dec of those joint embeddings). MovieLens: two disjoint genre groups of the run's
  dataset; Amazon: the run's category -> `cross_domain_target`;
- model_agnostic.py: A-LLMRec on each CF backbone (CF, stage 1 and stage 2 trained again);
- ablations.py: stage 1 without the matching / reconstruction / rec loss and with SBERT
  frozen (stage 1 and 2 trained again on the run's CF model); stage 2 without the user
  token, without the joint embeddings, with random joint embeddings;
- efficiency.py: seconds per training step and per epoch, and per user at inference
  (ranking + generation), A-LLMRec vs TALLRec on this machine.

Everything trained or evaluated is kept under `workdir/tables/` (variant runs, per-user
ranks in `eval/<variant>/<key>.json`), so a rerun reuses finished parts and an interrupted
one resumes; each part writes `<part>.json` and `<part>.md` there, and `workdir/tables.md`
collects the finished parts.
"""
