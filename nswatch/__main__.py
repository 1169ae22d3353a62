from nswatch.cli import main

raise SystemExit(main())
