"""Schemathesis hooks for tests/api/fuzz.sh (loaded through SCHEMATHESIS_HOOKS).

Path parameters are sometimes replaced by the ids and names of objects fuzz.sh made in the first
organization (a started sandbox, a volume), so the toolbox endpoints run against a real sandbox
and the second organization's key is tried on objects it must not see. The extra check fails any
success of a foreign key on them (FUZZ_FOREIGN=1)."""

import os

import schemathesis
from hypothesis import strategies as st

KNOWN = {
    "sandboxId": [os.environ["FUZZ_SANDBOX_ID"]],
    "sandboxIdOrName": [os.environ["FUZZ_SANDBOX_ID"], os.environ["FUZZ_SANDBOX_NAME"]],
    "volumeId": [os.environ["FUZZ_VOLUME_ID"]],
    "name": [os.environ["FUZZ_VOLUME_NAME"]],
}
FOREIGN = os.environ.get("FUZZ_FOREIGN") == "1"
OWN_OBJECTS = {value for values in KNOWN.values() for value in values}


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
    if not FOREIGN or "{" not in case.operation.path or not case.path_parameters:
        return None
    if OWN_OBJECTS & {str(v) for v in case.path_parameters.values()} and response.status_code < 300:
        raise AssertionError(
            f"a foreign key got {response.status_code} for {case.method} {case.formatted_path}"
        )
    return None
