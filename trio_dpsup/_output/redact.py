"""Secrets out of everything we show: /status, logs, evidence, and the ranks' own lines
wherever we serve or write them (the stderr tail of a failure, evidence, the status file).

A rank's command line carries API keys in many spellings. Redaction works two ways, and
both are applied to every argument, also inside one (``sh -c "... --api-key X"``):

* **by name**: the value of an option, environment assignment, JSON or Python dict key,
  HTTP header or URL query parameter whose name has a part (split on ``-``, ``_``, ``.``)
  that ends in key, token, secret, password, passwd, passphrase, bearer, signature,
  credential or authorization (or their plurals), or is pass, pwd, auth, sig or cookie:
  ``--api-key X``, ``--api-keys=X``, ``--hf-token X``, ``--pass X``, ``--credentials X``,
  ``HF_TOKEN=X``, ``'{"api_key": "X"}'``, ``{'api_key': 'X'}``, ``-H 'X-Api-Key: X'``,
  ``--header=X-Api-Key: X``, ``-HX-Api-Key: X``, ``?X-Amz-Signature=X``, ``&sig=X``. Parts,
  not substrings, so ``--tokenizer`` stays readable; a plural beside a quantity
  (``--max-num-batched-tokens``, ``"max_tokens"``) is a count, not a secret. The value
  after a secret option is hidden even when it begins with one dash (``--api-key -X``);
  extra names (a server's own ``-k``) come from ``secret_options``;
* **by shape**: the password in a URL (``http://user:X@host``), the credentials after an
  auth scheme (``Bearer X``, ``Basic X``), and values that look like tokens wherever they
  are: known prefixes (``sk-``, ``hf_``, ``ghp_``, ``xoxb-``, ``AKIA``, JWTs), 32 and more
  characters mixing upper case, lower case and digits (but for a GPU's or MIG instance's
  UUID), and 48 and more hexadecimal digits (a 64-digit key; a 40-digit git revision stays
  readable).

And in what programs print: ``name = value`` and ``name: value`` with the name bare,
quoted, a bytes literal or URL-encoded, and the value quoted, a list or bare
(``API_KEY = "X"``, ``OpenAI(api_key = 'X')``, ``{b'api_key': b'X'}``, ``{"password":
["X"]}``, ``api%5Fkey=X``), a client's ``-u user:X``, and MySQL's ``-pX``.

What is redacted becomes ``***``. It errs towards hiding: a long mixed-case identifier that
is no secret is hidden too. Free prose cannot be promised: "the password is X" names no
key, and no pattern can tell X from the words around it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

__all__ = ["REDACTED", "is_secret_name", "redact_argv", "redact_text"]

REDACTED = "***"

_STEMS = ("key", "token", "secret", "password", "passwd", "passphrase", "bearer", "signature",
          "credential", "authorization")  # fmt: skip
_PLURALS = tuple(f"{stem}s" for stem in _STEMS)
_WHOLE = frozenset({"pass", "pwd", "auth", "cookie", "apikey", "sig"})
#: Parts that make a plural a count: ``max_tokens`` is a number of tokens, not tokens.
_QUANTITY = frozenset({"max", "min", "num", "n", "total", "batched", "prefill", "count",
                       "limit", "per"})  # fmt: skip

_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][\w+.-]*://[^/\s:@'\"]+:)[^/\s@'\"]+(?=@)")
# (Not `bearer = X`: that is a name and its value, _PAIR's.)
_AUTH_SCHEME = re.compile(r"(?i)(?P<head>\b(?:bearer|basic|token|digest)\s+)(?![=:])[^\s'\",;]+")
_JSON_PAIR = re.compile(r'(?P<head>"(?P<name>[^"\\]{1,100})"\s*:\s*)"(?:[^"\\]|\\.)*"')
_PY_PAIR = re.compile(r"(?P<head>'(?P<name>[^'\\]{1,100})'\s*:\s*)'(?:[^'\\]|\\.)*'")
_HEADER = re.compile(r"(?m)^(?P<head>\s*(?P<name>[A-Za-z][\w-]{0,100})\s*:\s*)\S.*$")
# A header given to an option in free text or one argument: -H 'Name: X', --header=Name: X.
_HEADER_OPTION = re.compile(
    r"(?P<head>(?<![\w-])(?:-H\s*|--header(?:=|\s+))['\"]?(?P<name>[A-Za-z][\w-]{0,100})"
    r"\s*:\s*)[^'\"\n]+"
)
_QUERY = re.compile(r"(?P<head>[?&](?P<name>[A-Za-z][\w.-]{0,100})=)[^&#\s'\"]+")
# Any `name = value` or `name: value` a program prints: the name bare, quoted, a bytes
# literal (b'api_key') or URL-encoded (api%5Fkey); the value quoted (bytes too), a list
# (['X'], ["X"]) or bare up to a delimiter: `API_KEY = "X"`, `OpenAI(api_key = 'X')`,
# `{b'api_key': b'X'}`, `{"password": ["X"]}`, `{api_key: X}`, `api_key=['X']`. Not a URL
# (`https://...`): its password is _URL_PASSWORD's.
_PAIR = re.compile(
    r"(?P<head>(?<![\w%.-])(?:b?['\"])?(?P<name>[A-Za-z_][\w.%-]{0,100})['\"]?\s*[=:]\s*)"
    r"(?!//)(?:b?'(?:[^'\\\n]|\\.)*'|b?\"(?:[^\"\\\n]|\\.)*\"|\[[^\]\n]*\]|[^\s,;&|)}\]'\"]+)"
)
# A user and password given to a client: `curl -u admin:X`, `--user=admin:X`.
_USER_PASSWORD = re.compile(
    r"(?P<head>(?<![\w-])(?:-u\s*|--user(?:=|\s+))['\"]?[^\s:'\"]+:)[^\s'\"]+"
)
# MySQL's password glued to its option: `mysql -pX` (and mysqldump, mysqladmin, mariadb).
_MYSQL_PASSWORD = re.compile(
    r"(?P<head>\b(?:mysql|mysqldump|mysqladmin|mariadb)\b[^\n|;&]*?\s-p)[^\s'\"]+"
)
# In free text: `--name value` and `--name=value`, and `NAME=value` (a quoted value counts
# whole). A value never starts with two dashes: that is the next option.
_VALUE = r"(?P<value>'[^']*'|\"[^\"]*\"|(?!--)[^\s'\";&|)]+)"
_OPTION = re.compile(r"(?P<head>(?<![\w-])(?P<name>--?[A-Za-z][\w.-]*)(?:=|\s+))" + _VALUE)
_ASSIGN = re.compile(r"(?P<head>(?<![\w.-])(?P<name>[A-Za-z_][\w.]*)=)" + _VALUE)
_TOKEN = re.compile(
    r"\b(?:sk-[\w-]{16,}|hf_\w{16,}|gh[pousr]_\w{16,}|github_pat_\w{16,}|xox[abpr]-[\w-]{10,}"
    r"|AKIA[0-9A-Z]{16}|eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,})"
)
# NVIDIA's device names are no secret, though long and mixed: GPU-<uuid>, MIG-<uuid> (what
# `nvidia-smi -L` prints and the evidence and GPU failures name). `=` only as base64's
# padding: `served_model_name=meta-llama/Llama-3` is a name and a value, not one token.
_DEVICE_UUID = r"(?:GPU|MIG)-[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}"
_GENERIC_TOKEN = re.compile(
    rf"(?<![\w+/=-])(?!{_DEVICE_UUID}(?![\w+/=-]))[A-Za-z0-9_+/-]{{32,}}={{0,2}}(?![\w+/=-])"
)
_HEX_KEY = re.compile(r"(?<![0-9A-Za-z])(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{48,}"
                      r"(?![0-9A-Za-z])")  # fmt: skip


def is_secret_name(name: str, extra: Iterable[str] = ()) -> bool:
    """Whether an option, variable, JSON key, header or query parameter called `name`
    holds a secret."""
    if name in extra:
        return True
    parts = [p for p in re.split(r"[-_.]+", name.lower()) if p]
    if any(part.endswith(_STEMS) or part in _WHOLE for part in parts):
        return True
    return any(part.endswith(_PLURALS) for part in parts) and not _QUANTITY.intersection(parts)


def redact_argv(argv: Sequence[str], secret_options: Iterable[str] = ()) -> tuple[str, ...]:
    """`argv` with every secret (see the module doc) shown as ``***``."""
    extra = frozenset(secret_options)
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not (arg.startswith("--") or arg == "-"):
            out.append(REDACTED)  # the value, even one that begins with a dash
            hide_next = False
            continue
        hide_next = False
        if arg.startswith("-"):
            name, eq, _ = arg.partition("=")
            if is_secret_name(name.lstrip("-"), extra) or name in extra:
                if eq:
                    out.append(f"{name}={REDACTED}")
                    continue
                hide_next = True
        out.append(redact_text(arg, extra))
    return tuple(out)


def redact_text(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with the secrets found in it by name or by shape shown as ``***``."""
    names = frozenset(extra)

    def by_name(match: re.Match[str]) -> str:
        name = unquote(match.group("name")).lstrip("-")
        if not (is_secret_name(name, names) or match.group("name") in names):
            return match.group(0)
        if match.re is _JSON_PAIR:
            return f'{match.group("head")}"{REDACTED}"'
        if match.re is _PY_PAIR:
            return f"{match.group('head')}'{REDACTED}'"
        return match.group("head") + REDACTED

    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    text = _USER_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    text = _MYSQL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    text = _AUTH_SCHEME.sub(lambda m: m.group("head") + REDACTED, text)
    text = _JSON_PAIR.sub(by_name, text)
    text = _PY_PAIR.sub(by_name, text)
    text = _HEADER.sub(by_name, text)
    text = _HEADER_OPTION.sub(by_name, text)
    text = _QUERY.sub(by_name, text)
    text = _pairs(text, names)
    text = _OPTION.sub(by_name, text)
    text = _ASSIGN.sub(by_name, text)
    text = _TOKEN.sub(REDACTED, text)
    text = _HEX_KEY.sub(REDACTED, text)
    return _GENERIC_TOKEN.sub(_generic, text)


def _pairs(text: str, names: frozenset[str]) -> str:
    """_PAIR's secrets hidden. A pair whose name is no secret gives up only its name, not
    its value: in `config: api_key = X` the value of `config` is the next pair's name."""
    out: list[str] = []
    pos = 0
    while (match := _PAIR.search(text, pos)) is not None:
        name = match.group("name")
        if is_secret_name(unquote(name), names) or name in names:
            out.append(text[pos : match.start()] + match.group("head") + REDACTED)
            pos = match.end()
        else:
            out.append(text[pos : match.end("name")])
            pos = match.end("name")
    out.append(text[pos:])
    return "".join(out)


def _generic(match: re.Match[str]) -> str:
    value = match.group(0)
    mixed = (
        any(c.isupper() for c in value)
        and any(c.islower() for c in value)
        and any(c.isdigit() for c in value)
    )
    return REDACTED if mixed else value
