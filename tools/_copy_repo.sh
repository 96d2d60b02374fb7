# Helpers of the scripts that build the kernels in a temporary copy of the repository.

# copy_repo ROOT DEST: the repository's sources (no build products, no .git) into DEST.
copy_repo() {
    local root=$1 dest=$2
    if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # Tracked and untracked-but-not-ignored files.
        (cd "$root" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) |
            (cd "$dest" && tar -xf -)
    else
        (cd "$root" && tar --exclude=./build --exclude='*.so' --exclude='./pyx/*.c' -cf - .) |
            (cd "$dest" && tar -xf -)
    fi
}

# start_work_copy ROOT PREFIX: copy ROOT to a new temporary directory $work and cd there.
# At exit it is removed when $status is 0 and KEEP is unset, else kept and named.
start_work_copy() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/$2.XXXXXX")
    trap _end_work_copy EXIT
    echo "== copy $1 -> $work"
    copy_repo "$1" "$work"
    cd "$work"
}

_end_work_copy() {
    if [[ ${status:-1} -eq 0 && -z "${KEEP:-}" ]]; then rm -rf "$work"; else echo "kept $work"; fi
}
