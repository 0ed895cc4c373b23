"""The stage-2 variants as data: what each model of the evaluation feeds the LLM and trains.

One frozen `Variant` per model, in one registry (`VARIANTS`) that the runner, the
baselines (`trainers/baselines.py`), the paper tables (`paper_tables/`) and the
experiment scripts read; `stage2.train` and `Stage2Run.evaluator` take a Variant instead
of flags.

  variant        soft tokens  user (x_u)  item table / tokens   trains
  allmrec        yes          cf          configured (joint)    projectors (+ LoRA when
                                                                 config.stage2.train_lora)
  sbert          yes          cf          text                  projectors
  mlp_llm        yes          cf          cf                    projectors
  no_user        yes          none        configured            projectors
  no_items       yes          cf          none                  projectors
  random_items   yes          cf          random                projectors
  tallrec        no           -           -                     LoRA adapters
  llm_only       no           -           -                     nothing

`items="none"` leaves the item soft tokens out of the prompt; F_I is still built over the
configured table, so the parameter tree is A-LLMRec's.
"""

from __future__ import annotations

import dataclasses

USER_SOURCES = ("cf", "none")            # cf: x_u of the CF model; none: no user token
ITEM_SOURCES = ("config", "joint", "text", "cf", "random", "none")
TABLE_SOURCES = ("joint", "text", "cf", "random")   # item tables F_I can be fed


@dataclasses.dataclass(frozen=True)
class Variant:
  """One stage-2 model.

  name: the registry key; its evaluation is kept as eval/<name>.json.
  label: its row in results.md and the paper tables.
  folder: its training folder under the run folder (None: nothing trained, LLM-Only).
  soft: soft tokens in the prompt (False: text-only prompts, LLM-Only and TALLRec).
  user: USER_SOURCES, the user token's input.
  items: ITEM_SOURCES, the table fed to F_I ("config": config.stage2.item_source;
    "none": no item soft token, F_I over the configured table).
  lora: trains the LLM's LoRA adapters whatever config.stage2.train_lora says (TALLRec).
  doc: one line for the reader.
  """
  name: str
  label: str
  folder: str | None
  soft: bool = True
  user: str = "cf"
  items: str = "config"
  lora: bool = False
  doc: str = ""

  def __post_init__(self):
    if self.user not in USER_SOURCES:
      raise ValueError(f"variant {self.name}: user={self.user!r}; one of {USER_SOURCES}")
    if self.items not in ITEM_SOURCES:
      raise ValueError(f"variant {self.name}: items={self.items!r}; one of {ITEM_SOURCES}")

  @property
  def text_only(self) -> bool:
    """Prompts without any soft token."""
    return not self.soft

  @property
  def use_user(self) -> bool:
    return self.soft and self.user != "none"

  @property
  def use_items(self) -> bool:
    return self.soft and self.items != "none"

  @property
  def trained(self) -> bool:
    return self.folder is not None

  def item_source(self, configured: str) -> str:
    """The item table fed to F_I, `configured` = config.stage2.item_source."""
    return self.items if self.items in TABLE_SOURCES else configured

  def trains_lora(self, train_lora: bool) -> bool:
    """Whether the LoRA adapters train, `train_lora` = config.stage2.train_lora."""
    return self.lora or (train_lora and self.soft)

  def renamed(self, name: str, label: str, folder: str | None = None) -> Variant:
    """The same model under another key, label and training folder (few-shot, timing)."""
    return dataclasses.replace(self, name=name, label=label,
                               folder=self.folder if folder is None else folder)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("allmrec", "A-LLMRec", "stage2",
            doc="The paper's stage 2: x_u and the joint item embeddings as soft tokens."),
    Variant("sbert", "A-LLMRec (SBERT)", "stage2_sbert", items="text",
            doc="Stage 2 on the text-path joint embeddings f_T^enc(SBERT(text))."),
    Variant("mlp_llm", "MLP-LLM", "stage2_mlp_llm", items="cf",
            doc="Stage 2 trained again with F_I fed the CF item embeddings (no stage 1)."),
    Variant("llm_only", "LLM-Only", None, soft=False,
            doc="The frozen LLM on the text-only prompts; nothing trained."),
    Variant("tallrec", "TALLRec", "stage2_tallrec", soft=False, lora=True,
            doc="LoRA adapters (config.llm.lora_*) trained on the text-only prompts of "
                "LLM-Only with stage 2's budget and optimizer (TALLRec: Bao et al. 2023, "
                "rank 8 on q and v)."),
    Variant("no_user", "A-LLMRec w/o user representation", "stage2_no_user", user="none",
            doc="Stage-2 ablation: no user token."),
    Variant("no_items", "A-LLMRec w/o joint embedding", "stage2_no_items", items="none",
            doc="Stage-2 ablation: no item soft tokens."),
    Variant("random_items", "A-LLMRec with random joint embedding", "stage2_random_items",
            items="random",
            doc="Stage-2 ablation: a fixed random table instead of the joint one."),
)}


def configured(cfg) -> Variant:
  """A-LLMRec as `config.stage2` sets it up (`cfg.use_user` / `cfg.use_items` leave a soft
  token out): the model trained in stage2/ and reported as A-LLMRec."""
  return dataclasses.replace(VARIANTS["allmrec"], user="cf" if cfg.use_user else "none",
                             items="config" if cfg.use_items else "none")
