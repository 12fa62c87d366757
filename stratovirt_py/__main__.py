from stratovirt_py.cli import main

raise SystemExit(main())
