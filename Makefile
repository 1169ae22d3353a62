# The same entry points as ./run and ./test, for those who type make.
# (A fresh Debian has no make: ./run and ./test need only bash.)
.PHONY: run test install lint wheel clean

run:
	./run $(ARGS)

test:
	./test $(ARGS)

install:
	bash .ci/install test

lint: install
	.venv/bin/ruff check nswatch tests
	.venv/bin/ruff format --check nswatch tests
	.venv/bin/mypy nswatch tests

wheel: install
	.venv/bin/pip wheel -q --no-deps -w dist .

clean:
	rm -rf .venv dist build *.egg-info .mypy_cache .ruff_cache .pytest_cache
