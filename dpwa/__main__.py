from dpwa.cli import main

raise SystemExit(main())
