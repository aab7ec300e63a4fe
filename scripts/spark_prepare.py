"""The ``spark-submit`` entry of preparation (spark-submit runs a file, not ``-m``):

    spark-submit [spark options] scripts/spark_prepare.py data.engine=spark data.spark.master=null [overrides]

The same as ``python -m unirec.data.prepare``; ``data.spark.master=null`` leaves the master to spark-submit.
"""

from unirec.data.prepare import main

if __name__ == "__main__":
    main()
