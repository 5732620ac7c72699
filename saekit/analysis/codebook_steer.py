"""Steering a codebook model with codes: a state's code forced on while ALL its codebooks run (Codebook Features §5).

`saekit steer --codebook-model DIR --dict DIR/codebooks/HOOK --feature L.G.C` lands here
(`saekit.analysis.steer.steer` dispatches); the follow-rate report is `saekit.toy.steer`'s.
"""

from __future__ import annotations

import torch


def steer_codebook_model(cfg) -> dict:
    """`saekit steer --codebook-model DIR --dict DIR/codebooks/HOOK --feature L.G.C`: force codes on, all codebooks active.

    The forced code replaces its group's choice, prompt and generated tokens alike (Codebook
    Features' `generate_with_codes`), at the positions of the digit slot where it fires on its
    own (a state code fires on a state's last digit, so it is forced on every state's last
    digit: "every state just completed was s"); the unsteered arm is the same codebook model
    with the same sampling seed.  Returns the fields of a
    `saekit.analysis.steer.SteerResult` (which `steer` builds), whose `toy` report counts
    generated states that are successors of the code's state.
    """
    from saekit.analysis.codebook_model import CodebookModel
    from saekit.analysis.ids import feature_id, parse_feature_ids
    from saekit.errors import SaekitError
    from saekit.interop import load as load_dict
    from saekit.toy.fsm import load_fsm
    from saekit.toy.steer import toy_report, tracked_code_state

    cbm = CodebookModel.load(cfg.codebook_model, device=cfg.device)
    if not cfg.dict:
        raise SaekitError(f"pass --dict with the codebook whose codes to force, e.g. {cfg.codebook_model}/codebooks/{cbm.hooks[-1]}")
    hook = load_dict(cfg.dict).prov.hook
    if hook not in cbm.codebooks:
        raise SaekitError(f"--dict {cfg.dict} is a codebook for {hook}, which the codebook model has none of (it has {', '.join(cbm.hooks)})")
    d = cbm.codebooks[hook]
    idx = parse_feature_ids(d, cfg.feature)
    fsm = load_fsm(cbm.path)
    body = cfg.prompt.strip()
    if not body.isdigit():
        raise SaekitError(f"--prompt {cfg.prompt!r}: on the toy model a prompt is digits (a walk, e.g. 3752)")
    ids = [cbm.bos_id] + [int(c) for c in body]
    n_ctx = int(getattr(cbm.hf.config, "n_positions", getattr(cbm.hf.config, "max_position_embeddings", 128)))
    if len(ids) + cfg.max_new_tokens > n_ctx:
        raise SaekitError(f"prompt ({len(ids)} tokens) + {cfg.max_new_tokens} new tokens exceed the model's context of {n_ctx}; shorten one")
    start = torch.tensor([ids] * cfg.samples)
    end = len(ids) + cfg.max_new_tokens
    tracked = tracked_code_state(cbm, hook, idx[0], fsm)
    slot = tracked.digit if tracked.digit >= 0 else fsm.digits - 1
    at = torch.tensor([p >= 1 and (p - 1) % fsm.digits == slot for p in range(end)])
    plain = cbm.sample(cfg.samples, end, cfg.seed, prompt=start, temperature=cfg.temperature)[:, len(ids):]
    steered = cbm.sample(cfg.samples, end, cfg.seed, prompt=start, temperature=cfg.temperature, force={hook: idx}, force_at=at)[:, len(ids):]
    dec = lambda rows: ["".join("⏎" if t == cbm.bos_id else str(t) for t in r) for r in rows.tolist()]  # noqa: E731
    res = dict(prompt=cfg.prompt, features=[feature_id(d, i) for i in idx], strength=1.0, steered=dec(steered), unsteered=dec(plain),
               match=cfg.match)
    res["about"] = [f"code {feature_id(d, i)} of the codebook at {hook} forced on as its group's choice on digit {slot + 1} of every state, "
                    f"with all {len(cbm.hooks)} codebooks of {cfg.codebook_model} active (--strength is not used)" for i in idx]
    res["toy"] = toy_report(fsm, tracked, ids[1:], steered.tolist(), plain.tolist())
    if cfg.match:
        import re

        pattern = re.compile(cfg.match)
        res["steered_rate"] = sum(bool(pattern.search(s)) for s in res["steered"]) / len(res["steered"])
        res["unsteered_rate"] = sum(bool(pattern.search(s)) for s in res["unsteered"]) / len(res["unsteered"])
    return res
