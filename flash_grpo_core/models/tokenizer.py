"""A T5 tokenizer built entirely in code for the tiny and toy stacks: no files, no hub.

A Unigram vocabulary of common video-prompt words plus every printable ASCII character (with and
without SentencePiece's word-start marker), so any prompt tokenises without `<unk>`; whole words
score higher than their spelling, so they win.
"""

from __future__ import annotations

import string

from transformers import T5TokenizerFast

# Whole-word pieces of the tiny tokenizer: words common in video prompts. Anything else falls
# back to single characters.
_COMMON_WORDS = """
a an the and or but of in on at to from with without by for as into onto over under above below
near behind between through across along around up down left right forward backward is are was
be being it its this that these those there here he she they his her their one two three four
five many few some all each every other another more most very slowly quickly fast slow gently
softly suddenly while then after before during camera shot view scene video clip frame close
closeup wide aerial drone pan tilt zoom tracking static handheld cinematic realistic photorealistic
animated cartoon style film lighting light dark bright shadow sun sunlight sunset sunrise night
day morning evening sky cloud clouds rain snow fog wind storm water ocean sea wave waves river
lake beach sand mountain mountains hill forest tree trees grass flower flowers garden field road
street city town building house room window door wall floor table chair bed car bus train boat
ship plane bike man woman person people child children boy girl baby friend family crowd dog
cat bird birds horse fish cow sheep lion tiger bear rabbit fox wolf elephant monkey duck
butterfly bee head face eye eyes hand hands arm arms leg legs hair smile walks walking runs
running jumps jumping flies flying swims swimming dances dancing sits sitting stands standing
plays playing eats eating drinks drinking holds holding looks looking turns turning moves moving
falls falling rides riding drives driving rolls rolling spins spinning talks talking laughs
laughing sleeps sleeping reads reading writes writing cooks cooking red orange yellow green blue
purple pink brown black white gray grey gold silver colorful small big large tiny huge tall
short long old young new beautiful happy sad calm busy quiet empty full warm cold hot soft hard
smooth round square circle ball box cup book phone guitar piano music fire smoke star stars moon
space planet earth background foreground center top bottom side front back middle high low
detailed quality resolution motion blur focus depth sharp vivid
"""

_PAD, _EOS, _UNK = "<pad>", "</s>", "<unk>"
_METASPACE = "\u2581"  # "▁", SentencePiece's word-start marker


def build_tokenizer() -> T5TokenizerFast:
    """A small T5-style Unigram tokenizer built in code: no files, no hub.

    Ids 0/1/2 are `<pad>`/`</s>`/`<unk>` as in T5. Common words are whole pieces; every printable
    ASCII character exists both word-initial ("▁x") and word-internal ("x"), so any ASCII prompt
    tokenises without `<unk>` (other characters map to `<unk>`).
    """
    # Unigram picks the segmentation with the highest summed score: whole words (-5) beat their
    # spelling (-10 per character), so characters are only the fallback.
    vocab: dict[str, float] = {_PAD: 0.0, _EOS: 0.0, _UNK: 0.0}
    for word in _COMMON_WORDS.split():
        vocab.setdefault(_METASPACE + word, -5.0)
    vocab.setdefault(_METASPACE, -12.0)  # a word that starts with a character outside ASCII
    for char in sorted(set(string.printable) - set(string.whitespace)):
        vocab.setdefault(_METASPACE + char, -10.0)
        vocab.setdefault(char, -10.0)
    # In transformers 5, T5TokenizerFast is an alias of T5Tokenizer, a tokenizers-backed class
    # whose `vocab=[(piece, score), ...]` builds the Unigram model, the WhitespaceSplit +
    # Metaspace pre-tokenizer, the Metaspace decoder and the "append </s>" post-processor itself.
    # extra_ids=0: the 100 <extra_id_*> sentinels are only for span-corruption pre-training.
    return T5TokenizerFast(vocab=list(vocab.items()), pad_token=_PAD, eos_token=_EOS, unk_token=_UNK, extra_ids=0)
