"""SONAR's tokenizer: NLLB's sentencepiece model with fairseq2's control symbols, without fairseq2.

fairseq2 loads the sentencepiece model with extra control symbols: ``<pad>`` inserted at index 0 (every piece
moves up by one: pad 0, unk 1, bos 2, eos 3), then one ``__<lang>__`` token per language of the model card and
three data tags, appended in that order. Control symbols never come out of text, so encoding is sentencepiece's
ids plus one, between the mode's prefix and suffix; decoding drops every control token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

# the 202 languages of sonar-space's text_sonar_basic_encoder card, in the card's order (their token ids follow it)
SONAR_LANGS = (
    "ace_Arab", "ace_Latn", "acm_Arab", "acq_Arab", "aeb_Arab", "afr_Latn", "ajp_Arab", "aka_Latn", "amh_Ethi",
    "apc_Arab", "arb_Arab", "ars_Arab", "ary_Arab", "arz_Arab", "asm_Beng", "ast_Latn", "awa_Deva", "ayr_Latn",
    "azb_Arab", "azj_Latn", "bak_Cyrl", "bam_Latn", "ban_Latn", "bel_Cyrl", "bem_Latn", "ben_Beng", "bho_Deva",
    "bjn_Arab", "bjn_Latn", "bod_Tibt", "bos_Latn", "bug_Latn", "bul_Cyrl", "cat_Latn", "ceb_Latn", "ces_Latn",
    "cjk_Latn", "ckb_Arab", "crh_Latn", "cym_Latn", "dan_Latn", "deu_Latn", "dik_Latn", "dyu_Latn", "dzo_Tibt",
    "ell_Grek", "eng_Latn", "epo_Latn", "est_Latn", "eus_Latn", "ewe_Latn", "fao_Latn", "pes_Arab", "fij_Latn",
    "fin_Latn", "fon_Latn", "fra_Latn", "fur_Latn", "fuv_Latn", "gla_Latn", "gle_Latn", "glg_Latn", "grn_Latn",
    "guj_Gujr", "hat_Latn", "hau_Latn", "heb_Hebr", "hin_Deva", "hne_Deva", "hrv_Latn", "hun_Latn", "hye_Armn",
    "ibo_Latn", "ilo_Latn", "ind_Latn", "isl_Latn", "ita_Latn", "jav_Latn", "jpn_Jpan", "kab_Latn", "kac_Latn",
    "kam_Latn", "kan_Knda", "kas_Arab", "kas_Deva", "kat_Geor", "knc_Arab", "knc_Latn", "kaz_Cyrl", "kbp_Latn",
    "kea_Latn", "khm_Khmr", "kik_Latn", "kin_Latn", "kir_Cyrl", "kmb_Latn", "kon_Latn", "kor_Hang", "kmr_Latn",
    "lao_Laoo", "lvs_Latn", "lij_Latn", "lim_Latn", "lin_Latn", "lit_Latn", "lmo_Latn", "ltg_Latn", "ltz_Latn",
    "lua_Latn", "lug_Latn", "luo_Latn", "lus_Latn", "mag_Deva", "mai_Deva", "mal_Mlym", "mar_Deva", "min_Latn",
    "mkd_Cyrl", "plt_Latn", "mlt_Latn", "mni_Beng", "khk_Cyrl", "mos_Latn", "mri_Latn", "zsm_Latn", "mya_Mymr",
    "nld_Latn", "nno_Latn", "nob_Latn", "npi_Deva", "nso_Latn", "nus_Latn", "nya_Latn", "oci_Latn", "gaz_Latn",
    "ory_Orya", "pag_Latn", "pan_Guru", "pap_Latn", "pol_Latn", "por_Latn", "prs_Arab", "pbt_Arab", "quy_Latn",
    "ron_Latn", "run_Latn", "rus_Cyrl", "sag_Latn", "san_Deva", "sat_Beng", "scn_Latn", "shn_Mymr", "sin_Sinh",
    "slk_Latn", "slv_Latn", "smo_Latn", "sna_Latn", "snd_Arab", "som_Latn", "sot_Latn", "spa_Latn", "als_Latn",
    "srd_Latn", "srp_Cyrl", "ssw_Latn", "sun_Latn", "swe_Latn", "swh_Latn", "szl_Latn", "tam_Taml", "tat_Cyrl",
    "tel_Telu", "tgk_Cyrl", "tgl_Latn", "tha_Thai", "tir_Ethi", "taq_Latn", "taq_Tfng", "tpi_Latn", "tsn_Latn",
    "tso_Latn", "tuk_Latn", "tum_Latn", "tur_Latn", "twi_Latn", "tzm_Tfng", "uig_Arab", "ukr_Cyrl", "umb_Latn",
    "urd_Arab", "uzn_Latn", "vec_Latn", "vie_Latn", "war_Latn", "wol_Latn", "xho_Latn", "ydd_Hebr", "yor_Latn",
    "yue_Hant", "zho_Hans", "zho_Hant", "zul_Latn",
)
DATA_TAGS = ("<MINED_DATA>", "<MMT_BT_DATA>", "<SMT_BT_DATA>")
PAD, UNK, BOS, EOS = 0, 1, 2, 3


class SonarTokenizer:
    """Text <-> token ids as fairseq2's ``NllbTokenizer`` for SONAR.

    ``encode(text, lang)`` (source mode): ``[__lang__, pieces..., </s>]``; :meth:`target_prefix`:
    ``[</s>, __lang__]`` (the decoder's prompt); ``decode(ids)``: the text of the non-control ids.
    """

    def __init__(self, path: str | Path, langs: Sequence[str] = SONAR_LANGS, default_lang: str = "eng_Latn") -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError("the SONAR tokenizer needs sentencepiece: pip install sentencepiece") from e
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SONAR tokenizer {path} not found (sentencepiece.source.256000.model)")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from e
        if (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) != (0, 1, 2) or self.sp.pad_id() != -1:
            raise ValueError(f"{path}: expected NLLB's control ids (unk 0, bos 1, eos 2, no pad), got unk "
                             f"{self.sp.unk_id()}, bos {self.sp.bos_id()}, eos {self.sp.eos_id()}, pad {self.sp.pad_id()}")
        self.langs = tuple(langs)
        if default_lang not in self.langs:
            raise ValueError(f"default language {default_lang!r} is not one of the tokenizer's languages")
        self.default_lang = default_lang
        pieces = self.sp.get_piece_size()
        self.lang_ids = {lang: 1 + pieces + i for i, lang in enumerate(self.langs)}
        self.vocab_size = 1 + pieces + len(self.langs) + len(DATA_TAGS)
        self._first_control = 1 + pieces  # language tokens and data tags from here on

    def lang_id(self, lang: str | None) -> int:
        lang = lang or self.default_lang
        if lang not in self.lang_ids:
            near = [code for code in self.langs if code.split("_")[0] == lang.split("_")[0]]
            hint = f" (did you mean {' or '.join(near)}?)" if near else " (NLLB codes such as eng_Latn, fra_Latn)"
            raise ValueError(f"unknown language {lang!r}{hint}; the tokenizer knows {len(self.langs)} languages")
        return self.lang_ids[lang]

    def encode(self, text: str, lang: str | None = None) -> Tensor:
        """int64 [S]: ``[__lang__, pieces..., </s>]`` (SONAR's source mode)."""
        pieces = self.sp.EncodeAsIds(text)
        return torch.tensor([self.lang_id(lang), *(i + 1 for i in pieces), EOS], dtype=torch.int64)

    def target_prefix(self, lang: str | None = None) -> Tensor:
        """int64 [2]: ``[</s>, __lang__]``, the decoder's prompt (SONAR's target mode)."""
        return torch.tensor([EOS, self.lang_id(lang)], dtype=torch.int64)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """The text of token ids (control tokens, languages and padding dropped)."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.sp.DecodeIds([i - 1 for i in ids if PAD < i < self._first_control])
