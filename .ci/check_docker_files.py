#!/usr/bin/env python3
"""Checks the Docker files without a Docker engine.

Dockerfile: every instruction is a known one, the first is FROM (or ARG), every image is
pinned to a tag, `COPY --from` names an earlier stage, exec-form CMD/ENTRYPOINT/HEALTHCHECK
are JSON arrays of strings, and the entry point of each stage that has one is either a script
of the repository that the stage copied (it exists, is executable on disk and in git and
passes `bash -n`) or a program the stage copied from an earlier one, which built it from an
example of the repository (`cargo build ... --example NAME`, examples/NAME.rs); such a stage's
health check runs the same program.

.dockerignore: keeps target/ out and does not hide what the build copies.

docker-compose.yml: valid YAML with the postgres, mariadb and faktory services, each on a
pinned image, publishing the ports and setting the variables that the tests' defaults expect;
a worker service, if any, builds a stage of the Dockerfile and gives the worker longer to stop
than its DTB_SHUTDOWN_TIMEOUT.

Prints every problem found and exits 1 if there is any.
"""

import fnmatch
import json
import os
import re
import subprocess
import sys

INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
    "WORKDIR",
}

# What the tests expect of the compose services (see README: Running the tests).
COMPOSE = {
    "postgres": {
        "image": "postgres",
        "ports": {5432},
        "environment": {"POSTGRES_USER": "postgres", "POSTGRES_DB": "test",
                        "POSTGRES_HOST_AUTH_METHOD": "trust"},
    },
    "mariadb": {
        "image": "mariadb",
        "ports": {3306},
        "environment": {"MARIADB_ALLOW_EMPTY_ROOT_PASSWORD": "1", "MARIADB_DATABASE": "test"},
    },
    "faktory": {
        "image": "contribsys/faktory",
        "ports": {7419, 7420},
        "environment": {},
    },
}

problems = []
dockerfile_stages = []  # the Dockerfile's stage names, for docker-compose.yml's builds


def problem(where, message):
    problems.append(f"{where}: {message}")


def logical_lines(text):
    """Yields (line number, instruction line) with comments dropped and continuations joined."""
    pending, start = [], None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if start is None:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        yield start, " ".join(p.strip() for p in pending if p.strip())
        pending, start = [], None
    if pending:
        yield start, " ".join(pending)
        problem(f"Dockerfile:{start}", "the file ends inside a continued instruction")


def pinned(image):
    """Whether an image reference names a tag other than latest, or a digest."""
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and not name.endswith(":latest")


def check_dockerfile(path, ignore_patterns):
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        problem(path, f"cannot read: {e}")
        return
    stages = []
    workdir = "/"
    copied_root = None  # where `COPY . <dest>` put the build context, in this stage
    runs = {}  # stage index -> its RUN lines
    copied_from = {}  # destination in this stage -> (earlier stage, source)
    entrypoints = []  # (where, program, workdir, copied root, copied_from, stage index)
    healthchecks = {}  # stage index -> (where, program) of its exec-form HEALTHCHECK
    seen_from = False
    for number, line in logical_lines(text):
        where = f"{path}:{number}"
        keyword, _, rest = line.partition(" ")
        keyword_upper = keyword.upper()
        rest = rest.strip()
        if keyword_upper not in INSTRUCTIONS:
            problem(where, f"unknown instruction {keyword!r}")
            continue
        if keyword != keyword_upper:
            problem(where, f"write instructions in upper case: {keyword!r}")
        if not seen_from and keyword_upper not in ("FROM", "ARG"):
            problem(where, f"{keyword_upper} before the first FROM")
        if not rest:
            problem(where, f"{keyword_upper} without arguments")
            continue
        if keyword_upper == "FROM":
            seen_from = True
            words = [w for w in rest.split() if not w.startswith("--")]
            image = words[0]
            if len(words) == 3 and words[1].upper() == "AS":
                stages.append(words[2].lower())
            elif len(words) != 1:
                problem(where, f"malformed FROM: {rest!r}")
                stages.append(None)
            else:
                stages.append(None)
            if image.lower() not in stages[:-1] and image != "scratch" and not pinned(image):
                problem(where, f"image {image!r} is not pinned to a tag")
            workdir = "/"
            copied_root = None
            copied_from = {}
        elif keyword_upper in ("COPY", "ADD"):
            flags = re.findall(r"--(\w[\w-]*)(?:=(\S+))?", rest)
            args = [w for w in rest.split() if not w.startswith("--")]
            for name, value in flags:
                if name == "from":
                    earlier = stages[:-1]
                    ref = value.lower()
                    is_index = ref.isdigit() and int(ref) < len(earlier)
                    is_image = ":" in ref or "/" in ref
                    if not (ref in earlier or is_index or is_image):
                        problem(where, f"COPY --from={value}: no earlier stage has that name "
                                       f"(stages: {[s for s in earlier if s]})")
                    elif ref in earlier and len(args) == 2:
                        dest = os.path.normpath(os.path.join(workdir, args[1]))
                        copied_from[dest] = (earlier.index(ref), args[0])
            if len(args) < 2:
                problem(where, f"{keyword_upper} needs a source and a destination")
            elif not any(n == "from" for n, _ in flags):
                for src in args[:-1]:
                    if src in (".", "./"):
                        dest = args[-1]
                        copied_root = os.path.normpath(os.path.join(workdir, dest))
                    elif not os.path.exists(src.lstrip("/")):
                        problem(where, f"{keyword_upper} source {src!r} is not in the repository")
                    elif ignored(src, ignore_patterns):
                        problem(where, f"{keyword_upper} source {src!r} is excluded by .dockerignore")
        elif keyword_upper == "WORKDIR":
            workdir = os.path.normpath(os.path.join(workdir, rest))
        elif keyword_upper == "RUN":
            runs.setdefault(len(stages) - 1, []).append(rest)
        elif keyword_upper == "HEALTHCHECK" and "CMD [" in rest:
            exec_form = rest[rest.index("CMD [") + len("CMD "):]
            try:
                value = json.loads(exec_form)
            except json.JSONDecodeError as e:
                problem(where, f"HEALTHCHECK CMD is not a valid JSON array: {e}")
                continue
            if value and all(isinstance(v, str) for v in value):
                healthchecks[len(stages) - 1] = (where, value[0])
            else:
                problem(where, "HEALTHCHECK CMD must be a JSON array of strings")
        elif keyword_upper in ("CMD", "ENTRYPOINT"):
            if rest.startswith("["):
                try:
                    value = json.loads(rest)
                except json.JSONDecodeError as e:
                    problem(where, f"{keyword_upper} is not a valid JSON array: {e}")
                    continue
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    problem(where, f"{keyword_upper} must be a JSON array of strings")
                    continue
                if keyword_upper == "ENTRYPOINT" and value:
                    entrypoints.append((where, value[0], workdir, copied_root,
                                        dict(copied_from), len(stages) - 1))
    dockerfile_stages.extend(s for s in stages if s)
    if not seen_from:
        problem(path, "no FROM instruction")
    if not entrypoints:
        problem(path, "no exec-form ENTRYPOINT")
    for where, program, at, root, copies, stage in entrypoints:
        full = os.path.normpath(os.path.join(at, program))
        if full in copies:
            check_built_entrypoint(where, full, copies[full], stages, runs,
                                   healthchecks.get(stage))
        else:
            check_entrypoint(where, program, at, root, ignore_patterns)


def check_built_entrypoint(where, program, copied, stages, runs, healthcheck):
    """An entry point copied from an earlier stage: that stage built it from an example of
    the repository, and the stage's health check runs the same program."""
    stage, source = copied
    name = os.path.basename(program)
    built = [r for r in runs.get(stage, [])
             if re.search(rf"--example[ =]{re.escape(name)}(\s|$)", r) and source in r]
    if not built:
        problem(where, f"the entry point {program} comes from stage {stages[stage] or stage}, "
                       f"whose RUN lines do not build --example {name} into {source}")
    elif not os.path.isfile(f"examples/{name}.rs"):
        problem(where, f"the entry point {program} is built from examples/{name}.rs, "
                       "which does not exist")
    if healthcheck is not None and healthcheck[1] != program:
        problem(healthcheck[0], f"the health check runs {healthcheck[1]}, not the entry point "
                                f"{program}")


def check_entrypoint(where, program, workdir, copied_root, ignore_patterns):
    """The entry point must be a script of this repository that the image copied."""
    if copied_root is None:
        problem(where, "the build context is never copied (COPY . <dir>): "
                       f"cannot find the entry point {program!r}")
        return
    full = os.path.normpath(os.path.join(workdir, program))
    rel = os.path.relpath(full, copied_root)
    if rel.startswith(".."):
        problem(where, f"the entry point {program!r} is not inside the copied context "
                       f"({copied_root})")
        return
    if not os.path.isfile(rel):
        problem(where, f"the entry point {rel!r} does not exist")
        return
    if ignored(rel, ignore_patterns):
        problem(where, f"the entry point {rel!r} is excluded by .dockerignore")
    if not os.access(rel, os.X_OK):
        problem(where, f"the entry point {rel!r} is not executable")
    mode = subprocess.run(["git", "ls-files", "-s", "--", rel], capture_output=True,
                          text=True).stdout.split()
    if mode and mode[0] != "100755":
        problem(where, f"the entry point {rel!r} is not executable in git (mode {mode[0]})")
    result = subprocess.run(["bash", "-n", rel], capture_output=True, text=True)
    if result.returncode != 0:
        problem(where, f"bash -n {rel}: {result.stderr.strip()}")


def read_dockerignore(path):
    if not os.path.isfile(path):
        problem(path, "missing")
        return []
    patterns = []
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line)
    if not any(p.rstrip("/").lstrip("/") in ("target", "**/target") for p in patterns):
        problem(path, "does not exclude target/")
    return patterns


def ignored(rel, patterns):
    """Whether .dockerignore excludes `rel` (or a directory above it); `!` re-includes."""
    rel = rel.strip("/")
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, p) or fnmatch.fnmatchcase(c, p.replace("**/", ""))
               for c in candidates):
            result = not negate
    return result


def published_ports(service, where):
    ports = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            target = entry.get("target")
        else:
            target = str(entry).split("/")[0].rsplit(":", 1)[-1]
        try:
            ports.add(int(target))
        except (TypeError, ValueError):
            problem(where, f"cannot read the port {entry!r}")
    return ports


def environment(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: None if v is None else str(v) for k, v in env.items()}


def seconds(value):
    """A compose duration such as `30s`, `1m30s` or `90`, in seconds; None if unreadable."""
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def check_worker_service(path, service):
    where = f"{path}: service worker"
    build = service.get("build")
    target = build.get("target") if isinstance(build, dict) else None
    if target not in dockerfile_stages:
        problem(where, f"builds target {target!r}, not a stage of the Dockerfile "
                       f"({dockerfile_stages})")
    timeout = seconds(environment(service).get("DTB_SHUTDOWN_TIMEOUT") or 20)
    grace = seconds(service.get("stop_grace_period", "10s"))
    if timeout is None or grace is None:
        problem(where, "cannot read DTB_SHUTDOWN_TIMEOUT or stop_grace_period")
    elif grace <= timeout:
        problem(where, f"stop_grace_period ({grace:g} s) must exceed the worker's "
                       f"DTB_SHUTDOWN_TIMEOUT ({timeout:g} s), or the drain is cut by SIGKILL")


def check_compose(path):
    try:
        import yaml
    except ImportError:
        problem(path, "PyYAML is missing (pip install pyyaml)")
        return
    try:
        doc = yaml.safe_load(open(path, encoding="utf-8"))
    except OSError as e:
        problem(path, f"cannot read: {e}")
        return
    except yaml.YAMLError as e:
        problem(path, f"invalid YAML: {e}")
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        problem(path, "no services mapping")
        return
    services = doc["services"]
    for name, expected in COMPOSE.items():
        where = f"{path}: service {name}"
        service = services.get(name)
        if not isinstance(service, dict):
            problem(where, "missing")
            continue
        image = str(service.get("image", ""))
        if image.split(":")[0] != expected["image"]:
            problem(where, f"image {image!r}, expected {expected['image']}:<tag>")
        elif not pinned(image):
            problem(where, f"image {image!r} is not pinned to a tag")
        missing = expected["ports"] - published_ports(service, where)
        if missing:
            problem(where, f"does not publish port(s) {sorted(missing)}")
        env = environment(service)
        for key, value in expected["environment"].items():
            if env.get(key) != value:
                problem(where, f"{key} should be {value!r}, is {env.get(key)!r}")
    if isinstance(services.get("worker"), dict):
        check_worker_service(path, services["worker"])


def main():
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    patterns = read_dockerignore(".dockerignore")
    check_dockerfile("Dockerfile", patterns)
    check_compose("docker-compose.yml")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in the Docker files", file=sys.stderr)
        return 1
    print("Dockerfile, .dockerignore and docker-compose.yml: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
