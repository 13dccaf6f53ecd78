# TEST DOUBLE for the environment-modules `module` command -- not Lmod, not Environment
# Modules. tests/envmodules/__init__.py exports it to Snakemake's job shells the way both
# real systems do, as the bash function `module` (environment variable BASH_FUNC_module%%).
# It implements only what the workflow's jobs call:
#   module purge                 unset LOADEDMODULES
#   module load NAME...          source $MODULEPATH/NAME (a sh snippet, not a Tcl/Lua
#                                modulefile), append NAME to LOADEDMODULES; a NAME without
#                                a file fails with status 1 and an error, as Lmod does
#   module is-loaded NAME...     status 0 when each NAME (or NAME/<version>) is loaded
# Anything else fails with status 2. With MODULE_DOUBLE_LOG set, each call appends a JSON
# line {"event": "purge"|"load"|"load-failed"|"is-loaded", "module": ..., "pid": ...}.
# Nothing may follow the function below (its text from "() {" is the exported value).
module() {
    local _sub="${1:-}" _m _status=0
    if [ "$#" -gt 0 ]; then shift; fi
    case "$_sub" in
        purge)
            unset LOADEDMODULES
            set -- ""
            ;;
        load)
            for _m in "$@"; do
                if [ ! -f "${MODULEPATH:-/nonexistent}/$_m" ]; then
                    echo "ERROR: Unable to locate a modulefile for '$_m' (module test double)" >&2
                    if [ -n "${MODULE_DOUBLE_LOG:-}" ]; then
                        printf '{"event": "load-failed", "module": "%s", "pid": %d}\n' "$_m" "$$" >>"$MODULE_DOUBLE_LOG"
                    fi
                    return 1
                fi
                . "$MODULEPATH/$_m"
                LOADEDMODULES="${LOADEDMODULES:+$LOADEDMODULES:}$_m"
                export LOADEDMODULES
                if [ -n "${MODULE_DOUBLE_LOG:-}" ]; then
                    printf '{"event": "load", "module": "%s", "pid": %d}\n' "$_m" "$$" >>"$MODULE_DOUBLE_LOG"
                fi
            done
            return 0
            ;;
        is-loaded)
            for _m in "$@"; do
                case ":${LOADEDMODULES:-}:" in
                    *":$_m:"* | *":$_m/"*) ;;
                    *) _status=1 ;;
                esac
            done
            ;;
        *)
            echo "module (test double): unsupported call: module $_sub $*" >&2
            return 2
            ;;
    esac
    if [ -n "${MODULE_DOUBLE_LOG:-}" ]; then
        for _m in "$@"; do
            printf '{"event": "%s", "module": "%s", "pid": %d}\n' "$_sub" "$_m" "$$" >>"$MODULE_DOUBLE_LOG"
        done
    fi
    return "$_status"
}
