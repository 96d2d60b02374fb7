# copy_repo ROOT DEST: the repository's sources (no build products, no .git) into DEST.
# Sourced by the scripts that build the kernels in a temporary copy.
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
