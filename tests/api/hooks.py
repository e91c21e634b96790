"""Schemathesis hooks for tests/api/fuzz.sh (loaded through SCHEMATHESIS_HOOKS).

Path parameters are sometimes replaced by the ids and names of objects fuzz.sh made in the first
organization (a started sandbox, a volume holding a file), so the toolbox endpoints run against a
real sandbox and the other runs' keys are tried on objects they must not see.

FUZZ_MODE says whose key the run sends:
  own        organization A's key: no answer carries anything of B;
  foreign    organization B's key on A's objects: A's objects answer like missing ones, and no
             answer carries anything of A;
  anonymous  no key, an invalid one or an unknown one: every endpoint refuses (401), and no
             answer carries anything of either organization.

"Anything of" an organization is FUZZ_SECRETS_A or FUZZ_SECRETS_B: the ids of its objects, its
organization id and markers fuzz.sh put in its sandbox's environment and in its volume's file. A marker the request itself carries (an id in the URL, echoed by a 404's message)
does not count.
"""

import os
from urllib.parse import unquote

import schemathesis
from hypothesis import strategies as st

KNOWN = {
    "sandboxId": [os.environ["FUZZ_SANDBOX_ID"]],
    "sandboxIdOrName": [os.environ["FUZZ_SANDBOX_ID"], os.environ["FUZZ_SANDBOX_NAME"]],
    "volumeId": [os.environ["FUZZ_VOLUME_ID"], os.environ["FUZZ_VOLUME_NAME"]],
    "name": [os.environ["FUZZ_VOLUME_NAME"]],
}
MODE = os.environ.get("FUZZ_MODE", "own")
OWN_OBJECTS = {value for values in KNOWN.values() for value in values}


def secrets(*names):
    return [s for name in names for s in os.environ.get(name, "").split(",") if s]


HIDDEN = {
    "own": secrets("FUZZ_SECRETS_B"),
    "foreign": secrets("FUZZ_SECRETS_A"),
    "anonymous": secrets("FUZZ_SECRETS_A", "FUZZ_SECRETS_B"),
}[MODE]
# The only endpoints that answer without a key: the document itself, and the metrics when no
# metrics token is set (aggregates naming no organization).
OPEN = {"/api/openapi.json", "/metrics"}


@schemathesis.hook
def flatmap_path_parameters(context, path_parameters):
    if not path_parameters:
        return st.just(path_parameters)
    known = {
        key: st.sampled_from(KNOWN[key]) for key in path_parameters if key in KNOWN
    }
    if not known:
        return st.just(path_parameters)
    return st.one_of(
        st.just(path_parameters),
        st.fixed_dictionaries({**{k: st.just(v) for k, v in path_parameters.items()}, **known}),
    )


@schemathesis.check
def foreign_objects_stay_hidden(ctx, response, case):
    """Another organization's sandbox or volume answers like one that does not exist."""
    if MODE != "foreign" or "{" not in case.operation.path or not case.path_parameters:
        return None
    if OWN_OBJECTS & {str(v) for v in case.path_parameters.values()} and response.status_code < 300:
        raise AssertionError(
            f"a foreign key got {response.status_code} for {case.method} {case.formatted_path}"
        )
    return None


@schemathesis.check
def unauthenticated_requests_are_refused(ctx, response, case):
    """Without a valid key nothing but the open endpoints succeeds."""
    if MODE != "anonymous" or case.operation.path in OPEN:
        return None
    if response.status_code < 400:
        raise AssertionError(
            f"no valid key, yet {response.status_code} for {case.method} {case.formatted_path}"
        )
    return None


def sent(response):
    """Everything the request carried (URL, headers, body), as text."""
    request = response.request
    body = request.body or b""
    if isinstance(body, str):
        body = body.encode()
    headers = " ".join(f"{k}: {v}" for k, v in request.headers.items())
    return f"{unquote(request.url)} {headers} ".encode() + body


@schemathesis.check
def no_other_organizations_data(ctx, response, case):
    """No answer to a foreign or missing key carries an id or a marker of the organizations the
    key does not belong to, unless the request itself carried it."""
    if not HIDDEN:
        return None
    answer = response.content or b""
    answer += " ".join(f"{k}: {v}" for k, v in response.headers.items()).encode()
    request = sent(response)
    leaked = [s for s in HIDDEN if s.encode() in answer and s.encode() not in request]
    if leaked:
        raise AssertionError(
            f"{case.method} {case.formatted_path} answered {response.status_code} with another "
            f"organization's {leaked}"
        )
    return None
