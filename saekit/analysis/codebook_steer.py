"""Steering a codebook model with codes: a state's code forced on while ALL its codebooks run (Codebook Features §5).

`saekit steer --codebook-model DIR --dict DIR/codebooks/HOOK --feature L.G.C` (one code) and
`saekit steer --codebook-model DIR --state S` (state S's codes at every codebook) land here
(`saekit.analysis.steer.steer` dispatches); the follow-rate report is `saekit.toy.steer`'s.

Forcing a whole state (`--state S`, `--sites`, default all codebooks): on the last digit of
every state, prompt and generated alike, each codebook's codes become those it has on S's
last digit after BOS + S ("S was just completed"); with `--positions state` (default, as
`intervene`'s default patches both digits of a state) the earlier digits of every state get
the codes they have after BOS + S + the same digits ("this state follows S"), so the whole
state being written reads as a successor of S; `--positions final` forces the last digits
only.  A state is two tokens: forcing its last digit alone leaves the next state's second
digit to be predicted at a position whose own codes still follow the context.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from saekit.errors import SaekitError


def state_patches(cbm, fsm, state: int, hooks: list[str], positions: str = "state") -> Callable[[Tensor], dict]:
    """A function tokens (n, L) → {hook: Patch} forcing state `state`'s codes at `hooks` (module docstring).

    Digit positions p >= 1 are slot (p − 1) mod digits of their state (prompts start on a state).
    A first digit that is not a digit (an end of walk) is left alone.
    """
    from saekit.analysis.codebook_model import Patch

    if positions not in ("state", "final"):
        raise SaekitError(f"positions={positions!r}: use state (every digit of every state) or final (each state's last digit)")
    D = fsm.digits
    digs = [int(x) for x in fsm.state_digits()[state]]
    cache: dict[tuple, dict[str, Tensor]] = {}

    def codes_after(prefix: tuple) -> dict[str, Tensor]:
        """Each hook's codes (d_dict,) at the last position of BOS + state + prefix (prefix (): the state's last digit)."""
        if prefix not in cache:
            rec = cbm.run(torch.tensor([[cbm.bos_id] + digs + list(prefix)]), record=True)[1]
            cache[prefix] = {h: rec.codes[h][0, -1] for h in hooks}
        return cache[prefix]

    def fn(tokens: Tensor) -> dict:
        n, L = tokens.shape
        last = [p for p in range(1, L) if (p - 1) % D == D - 1]
        if not last:  # no state completed yet: nothing to force
            return {}
        rows = tokens.tolist()
        pos: list[list[int]] = []
        codes: dict[str, list[list[Tensor]]] = {h: [] for h in hooks}
        for r in rows:
            ps = list(last)
            cs = {h: [codes_after(())[h]] * len(last) for h in hooks}
            if positions == "state":
                for p in range(1, L):
                    slot = (p - 1) % D
                    pre = tuple(r[p - slot:p + 1])
                    if slot < D - 1 and all(0 <= t < 10 for t in pre):
                        ps.append(p)
                        got = codes_after(pre)
                        for h in hooks:
                            cs[h].append(got[h])
            pos.append(ps)
            for h in hooks:
                codes[h].append(cs[h])
        width = max(len(ps) for ps in pos)
        for i, ps in enumerate(pos):  # pad with the first forced position (the same codes written twice)
            extra = width - len(ps)
            ps += [ps[0]] * extra
            for h in hooks:
                codes[h][i] += [codes[h][i][0]] * extra
        pt = torch.tensor(pos)
        return {h: Patch(pt, torch.stack([torch.stack(c) for c in codes[h]])) for h in hooks}

    return fn


def steer_state(cfg, cbm, fsm) -> dict:
    """`steer --codebook-model DIR --state S`: generations with state S's codes forced at every --sites codebook, beside unsteered ones."""
    from saekit.analysis.codebook_model import resolve_patch_sites
    from saekit.toy.steer import TrackedState, toy_report

    if not 0 <= cfg.state < fsm.n_states:
        raise SaekitError(f"--state {cfg.state} is no state of this FSM; use 0..{fsm.n_states - 1}")
    if cfg.dict or cfg.feature:
        raise SaekitError("give either --state (force a state's codes at every codebook) or --dict/--feature (force chosen codes), not both")
    hooks = resolve_patch_sites(cfg.sites, cbm.hooks)
    ids = _prompt_ids(cfg, cbm, fsm)
    if (len(ids) - 1) % fsm.digits:
        raise SaekitError(f"--prompt {cfg.prompt!r} is not whole states of {fsm.digits} digits; forcing a state needs prompts that end on a state")
    start = torch.tensor([ids] * cfg.samples)
    end = len(ids) + cfg.max_new_tokens
    plain = cbm.sample(cfg.samples, end, cfg.seed, prompt=start, temperature=cfg.temperature)[:, len(ids):]
    steered = cbm.sample(cfg.samples, end, cfg.seed, prompt=start, temperature=cfg.temperature,
                         patches=state_patches(cbm, fsm, cfg.state, hooks, cfg.positions))[:, len(ids):]
    where = "every digit of every state" if cfg.positions == "state" else "the last digit of every state"
    res = dict(prompt=cfg.prompt, features=[f"state {cfg.state:0{fsm.digits}d} at {cfg.sites}"], strength=1.0,
               steered=_decode(cbm, steered), unsteered=_decode(cbm, plain), match=cfg.match)
    res["about"] = [f"the codes of state {cfg.state:0{fsm.digits}d} forced at {len(hooks)} codebooks ({cfg.sites}) on {where}, "
                    f"with all {len(cbm.hooks)} codebooks of {cfg.codebook_model} active (--strength is not used)"]
    tracked = TrackedState(cfg.state, float("nan"), float("nan"), float("nan"), 1.0, 1.0, 0, fsm.digits - 1)
    res["toy"] = toy_report(fsm, tracked, ids[1:], steered.tolist(), plain.tolist())
    _match(cfg, res)
    return res


def _prompt_ids(cfg, cbm, fsm) -> list[int]:
    """BOS + the prompt's digits, checked against the model's context."""
    body = cfg.prompt.strip()
    if not body.isdigit():
        raise SaekitError(f"--prompt {cfg.prompt!r}: on the toy model a prompt is digits (a walk, e.g. 3752)")
    ids = [cbm.bos_id] + [int(c) for c in body]
    n_ctx = int(getattr(cbm.hf.config, "n_positions", getattr(cbm.hf.config, "max_position_embeddings", 128)))
    if len(ids) + cfg.max_new_tokens > n_ctx:
        raise SaekitError(f"prompt ({len(ids)} tokens) + {cfg.max_new_tokens} new tokens exceed the model's context of {n_ctx}; shorten one")
    return ids


def _decode(cbm, rows: Tensor) -> list[str]:
    return ["".join("⏎" if t == cbm.bos_id else str(t) for t in r) for r in rows.tolist()]


def _match(cfg, res: dict) -> None:
    if cfg.match:
        import re

        pattern = re.compile(cfg.match)
        res["steered_rate"] = sum(bool(pattern.search(s)) for s in res["steered"]) / len(res["steered"])
        res["unsteered_rate"] = sum(bool(pattern.search(s)) for s in res["unsteered"]) / len(res["unsteered"])


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
    from saekit.interop import load as load_dict
    from saekit.toy.fsm import load_fsm
    from saekit.toy.steer import toy_report, tracked_code_state

    cbm = CodebookModel.load(cfg.codebook_model, device=cfg.device)
    fsm = load_fsm(cbm.path)
    if cfg.state is not None:
        return steer_state(cfg, cbm, fsm)
    if not cfg.dict:
        raise SaekitError(f"pass --state S (force a state's codes at every codebook) or --dict with the codebook whose codes to force, "
                          f"e.g. {cfg.codebook_model}/codebooks/{cbm.hooks[-1]}")
    hook = load_dict(cfg.dict).prov.hook
    if hook not in cbm.codebooks:
        raise SaekitError(f"--dict {cfg.dict} is a codebook for {hook}, which the codebook model has none of (it has {', '.join(cbm.hooks)})")
    d = cbm.codebooks[hook]
    idx = parse_feature_ids(d, cfg.feature)
    ids = _prompt_ids(cfg, cbm, fsm)
    start = torch.tensor([ids] * cfg.samples)
    end = len(ids) + cfg.max_new_tokens
    tracked = tracked_code_state(cbm, hook, idx[0], fsm)
    slot = tracked.digit if tracked.digit >= 0 else fsm.digits - 1
    at = torch.tensor([p >= 1 and (p - 1) % fsm.digits == slot for p in range(end)])
    plain = cbm.sample(cfg.samples, end, cfg.seed, prompt=start, temperature=cfg.temperature)[:, len(ids):]
    steered = cbm.sample(cfg.samples, end, cfg.seed, prompt=start, temperature=cfg.temperature, force={hook: idx}, force_at=at)[:, len(ids):]
    res = dict(prompt=cfg.prompt, features=[feature_id(d, i) for i in idx], strength=1.0, steered=_decode(cbm, steered),
               unsteered=_decode(cbm, plain), match=cfg.match)
    res["about"] = [f"code {feature_id(d, i)} of the codebook at {hook} forced on as its group's choice on digit {slot + 1} of every state, "
                    f"with all {len(cbm.hooks)} codebooks of {cfg.codebook_model} active (--strength is not used)" for i in idx]
    res["toy"] = toy_report(fsm, tracked, ids[1:], steered.tolist(), plain.tolist())
    _match(cfg, res)
    return res
